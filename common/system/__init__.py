"""The process and the machine: ranks and collectives, the DeepSpeed engine's settings per world size, CPU threads, disks, atomic files, logs, the run lock, the program names commands show."""
