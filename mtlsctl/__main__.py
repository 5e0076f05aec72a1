"""`python -m mtlsctl`."""

from mtlsctl.cli import main

if __name__ == "__main__":
    main()
