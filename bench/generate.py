"""Generate job events as JSON lines: ``python -m bench.generate N > events.jsonl``."""

from meter.sim.fleet import main

if __name__ == "__main__":
    main()
