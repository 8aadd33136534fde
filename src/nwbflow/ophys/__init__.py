"""Calcium imaging science kernels (spike inference): built in the calcium issue."""
