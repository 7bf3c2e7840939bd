"""The crossing between processes: protocol, server, client, security."""
