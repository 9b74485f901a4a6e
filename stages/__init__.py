"""One module per DVC stage: `python -m stages.<name>`. Each has `run(...)`, which does the work
and is importable and testable, and a thin `main()` that parses paths, reads the stage's
validated settings from resolved/ and calls run(). Helpers shared by stages start with `_`."""
