"""`python -m zoft` is the same as the `zoft` command."""

from zoft.cli import main

main()
