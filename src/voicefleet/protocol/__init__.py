"""LiveKit's wire format and tokens: frames and JWTs, no I/O."""
