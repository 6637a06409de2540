"""Small tools that ship with DIT4C, so a fresh machine has something to run."""
