"""The process and the machine: ranks and collectives, CPU threads, disks, atomic files, logs, the run lock."""
