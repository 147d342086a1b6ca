"""Placement of arrays on devices: the mesh, logical axis rules and multi-host start-up."""
