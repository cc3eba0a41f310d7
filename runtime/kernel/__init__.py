"""The PLC kernel: the field table, the process image in shared memory, the scan, its clock and
statistics, the program contract. It imports nothing from drivers, programs, opcua_models or the
rooms above it (config, supervise, cli)."""
