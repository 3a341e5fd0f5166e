from layoutc.compiler.cli import main

raise SystemExit(main())
