"""organtrain: one image classifier per organ, trained for all organs at once."""
