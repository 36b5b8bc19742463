from halo_mlir.cli import main

main()
