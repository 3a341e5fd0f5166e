"""Model specs built on the family specs."""
