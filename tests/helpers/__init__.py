"""Builders that test modules share (never tests themselves: a test module is never imported by another)."""
