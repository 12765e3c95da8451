"""The control plane: projects and, next, agents, versions, rollouts, secrets."""
