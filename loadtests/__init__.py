"""Locust load tests of the search service."""
