"""`python -m specpt_hf.data.mock`: the same as `specpt mock`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
