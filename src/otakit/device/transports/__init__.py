"""Transports the agent downloads with; interchangeable behind transports.base.Transport."""
