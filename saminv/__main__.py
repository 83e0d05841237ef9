from saminv.cli import main

main()
