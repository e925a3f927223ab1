"""Scoring requests with a trained run and writing the competition's submission file."""
