from lynx_export.cli import main

main()
