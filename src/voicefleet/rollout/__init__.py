"""Rollout strategies: state machines over the routing table and the runtime."""
