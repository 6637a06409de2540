"""DIT4C: Data Intensive Tools for the Cloud."""
