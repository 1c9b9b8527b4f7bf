from actvpipe.cli import main

main()
