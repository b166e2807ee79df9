"""Maintenance scripts run by the Makefile (`make wheelhouse`)."""
