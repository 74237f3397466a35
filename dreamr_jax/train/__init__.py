"""Training loops behind train.py."""
