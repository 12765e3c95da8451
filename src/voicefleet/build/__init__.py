"""From an agent's folder to a runnable version: the bundle, safe extraction, the builder."""
