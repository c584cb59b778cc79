"""Helpers shared by the tests and bench/ (import them from here, never from a test module)."""
