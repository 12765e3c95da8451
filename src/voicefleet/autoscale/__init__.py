"""Autoscaling made for long sessions: see `policy` for the decisions, `loop` for applying them."""
