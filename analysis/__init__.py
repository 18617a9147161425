"""Turning run folders into tables and figures."""
