"""How load is shaped: the profile schema, profile files, arrival processes, traces."""
