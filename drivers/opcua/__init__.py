"""OPC UA client driver: nodes that are OPC UA servers."""
