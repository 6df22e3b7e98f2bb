"""Control module: keeps the ONe platform's webhook registrations pointing at the bridge."""
