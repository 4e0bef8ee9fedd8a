from fedmeta.cli import main

main()
