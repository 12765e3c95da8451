"""Feature flags: stored per agent, changed with an event, streamed to running agents."""
