"""Plans, capture and parallel restore of a process tree's ids (DESIGN.md, "Parallel restore")."""
