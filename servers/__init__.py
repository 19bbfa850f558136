"""servers: placeholder until its issue lands."""
