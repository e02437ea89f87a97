//! The 32-bit boot entries and the switch to long mode.
//!
//! Two ways in, one way on:
//!
//! * **PVH** — an ELF note `Xen`/18 (`XEN_ELFNOTE_PHYS32_ENTRY`) names
//!   `pvh_start32`. The VMM enters it in 32-bit protected mode, paging off,
//!   `ebx` = physical address of `hvm_start_info`.
//! * **Multiboot2** — a header in the first 32 KiB of the image names
//!   `mb2_start32` (entry-address tag; it is also the ELF entry point). GRUB
//!   enters it in 32-bit protected mode, paging off, `eax` = magic, `ebx` =
//!   physical address of the boot information.
//!
//! Both then build identity page tables for the first 4 GiB (2 MiB pages),
//! enable SSE (the host-target `core` uses it), PAE, long mode and paging,
//! load a 64-bit GDT, switch to the boot stack and call
//! `fractos_kernel_entry(protocol, magic, info)` with the System V ABI.
//! The kernel must define that symbol; it is declared weak here so host
//! test binaries that happen to link this object still link.
//!
//! The boot stack has an unmapped guard page below it once the kernel
//! installs its own page tables (`__boot_stack_guard`).
//!
//! The kernel's linker script must keep `.multiboot2` first and name both
//! entry symbols in `EXTERN(...)` so this object is linked at all.

core::arch::global_asm!(
    r#"
    .set MB2_MAGIC,    0xe85250d6
    .set MB2_ARCH,     0
    .set BOOT_STACK_SIZE, 0x40000

    /* ---------------- Multiboot2 header ---------------- */
    .pushsection .multiboot2, "a"
    .balign 8
mb2_header_start:
    .long MB2_MAGIC
    .long MB2_ARCH
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (MB2_MAGIC + MB2_ARCH + (mb2_header_end - mb2_header_start))
    /* entry address tag */
    .balign 8
    .short 3
    .short 0
    .long 12
    .long mb2_start32
    /* end tag */
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:
    .popsection

    /* ---------------- PVH ELF note ---------------- */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4             /* namesz: "Xen\0" */
    .long 4             /* descsz */
    .long 18            /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4
    .popsection

    /* ---------------- boot page tables and stack ---------------- */
    .pushsection .bss.fractos_boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .global __boot_stack_guard
__boot_stack_guard:
    .skip 4096
    .global __boot_stack_bottom
__boot_stack_bottom:
    .skip BOOT_STACK_SIZE
    .global __boot_stack_top
__boot_stack_top:
    .popsection

    /* ---------------- 64-bit GDT ---------------- */
    .pushsection .rodata.fractos_boot, "a"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code, ring 0 */
    .quad 0x00cf92000000ffff    /* 0x10: data, ring 0 */
boot_gdt_end:
    .balign 4
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .popsection

    /* ---------------- 32-bit entries ---------------- */
    .pushsection .text.fractos_boot32, "ax"
    .code32

    .global pvh_start32
    .type pvh_start32, @function
pvh_start32:
    cli
    cld
    movl $1, %esi           /* protocol: PVH */
    xorl %edx, %edx         /* no magic */
    movl %ebx, %edi         /* hvm_start_info */
    jmp boot32_common

    .global mb2_start32
    .type mb2_start32, @function
mb2_start32:
    cli
    cld
    movl $2, %esi           /* protocol: Multiboot2 */
    movl %eax, %edx         /* magic, checked in Rust */
    movl %ebx, %edi         /* boot information */

boot32_common:
    movl $__boot_stack_top, %esp

    /* PML4[0] -> PDPT, PDPT[0..4] -> PD[0..4] */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4
    movl $0, boot_pml4 + 4
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    movl $0, boot_pdpt + 4(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jne 1b

    /* 2048 PD entries: identity 2 MiB pages, present|write|huge */
    xorl %ecx, %ecx
2:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax          /* bits 32.. of (ecx << 21) */
    movl %eax, boot_pd + 4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 2b

    /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    /* EFER.LME */
    movl %edx, %ebp         /* rdmsr clobbers edx */
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    movl %ebp, %edx

    /* CR0: PG | MP | PE, clear EM and TS: SSE usable before any Rust runs */
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 3)), %eax
    orl $((1 << 31) | (1 << 1) | 1), %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $boot64

    /* ---------------- 64-bit ---------------- */
    .code64
boot64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movabsq $__boot_stack_top, %rsp
    xorl %ebp, %ebp
    fninit
    /* SysV: fractos_kernel_entry(protocol: u32 (edi), magic: u32 (esi), info: u64 (rdx)) */
    movl %edi, %eax         /* info */
    movl %esi, %edi         /* protocol */
    movl %edx, %esi         /* magic */
    movl %eax, %edx         /* info, zero-extended */
    call fractos_kernel_entry
3:
    cli
    hlt
    jmp 3b
    .popsection

    .weak fractos_kernel_entry
"#,
    options(att_syntax)
);
