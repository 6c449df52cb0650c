from wds_ocr.cli import main

main()
