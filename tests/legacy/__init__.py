"""Frozen copies of earlier sharpax code for old-versus-new tests."""
