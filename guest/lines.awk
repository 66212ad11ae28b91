# Preprocess a guest .S for the assembler (used by the Makefile):
#   awk -v file=guest/x.S -v src=x.S -f lines.awk x.S
# file: the name reported in ucalls (repo-relative); src: the name for messages and DWARF
# (relative to the assembler's working directory, guest/, so gdb finds the source).
# GNU as has no __FILE__/__LINE__, so:
#  - define the file name string .L__file once (before a "# 1" line marker, so that the line
#    numbers in messages and DWARF stay those of the real source),
#  - prefix every line N outside .macro bodies with ".set .L__line, N;" (line count unchanged).
# Lines inside a .macro body are left alone, so a macro expands with the line it is invoked on.
NR == 1 {
    printf ".pushsection .rodata; .L__file: .asciz \"%s\"; .popsection\n", file
    printf "# 1 \"%s\"\n", src
}
{
    is_macro = ($0 ~ /^[ \t]*\.macro([ \t]|$)/)
    is_endm = ($0 ~ /^[ \t]*\.endm([ \t;]|$)/)
    if (depth == 0 && !is_macro)
        printf ".set .L__line, %d; %s\n", NR, $0
    else
        print
    if (is_macro)
        depth++
    else if (is_endm && depth > 0)
        depth--
}
