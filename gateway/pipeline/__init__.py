"""From a stored call to enrolled steps: normalise, resolve the contact, store events, route through the rules."""
