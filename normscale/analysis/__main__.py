from normscale.analysis.report import main

main()
