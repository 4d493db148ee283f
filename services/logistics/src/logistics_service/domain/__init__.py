"""Pure rules of logistics: shipments (statuses, transitions, temperature) and shipping lanes."""
