"""The upload helper: sends a saved instance's image to the image server and tells the portal."""
