"""`python -m connpub.cli` runs the connpub command."""

from connpub.cli import main

main()
