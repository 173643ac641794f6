"""Story World."""
