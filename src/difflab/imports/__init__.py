"""Importing weights trained elsewhere into difflab runs."""
