from lowmem_tune.cli import main

main()
