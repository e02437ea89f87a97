//! `fractos image build`: the PVH ELF and the GRUB ISO.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use fractos_qemu::build::{self, Workspace};

use super::human_bytes;

/// `fractos image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the kernel ELF (PVH: qemu -kernel, Firecracker, cloud-hypervisor)
    /// and a bootable GRUB ISO (Multiboot2: bare metal, USB, -cdrom).
    Build(BuildArgs),
}

/// Options of `fractos image build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Output directory [default: target/images].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Kernel command line baked into the ISO's grub.cfg.
    #[arg(long, default_value = "fractos.log=info fractos.node=0")]
    pub cmdline: String,
    /// Cluster key file (64 hex digits) to put in the ISO as the Multiboot2
    /// module `fractos-cluster-key`; the ISO is then written mode 0600.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// Paths and sizes of built images.
pub struct Images {
    /// The PVH ELF.
    pub elf: PathBuf,
    /// The ISO.
    pub iso: PathBuf,
    /// ELF size in bytes.
    pub elf_bytes: u64,
    /// ISO size in bytes.
    pub iso_bytes: u64,
}

/// Builds both images into `out` (default `target/images`).
pub fn build_images(
    out: Option<PathBuf>,
    cmdline: &str,
    key_file: Option<&std::path::Path>,
) -> anyhow::Result<Images> {
    let ws = Workspace::source_tree().ok_or_else(|| {
        anyhow::anyhow!(
            "`fractos image build` builds the kernel from its sources, and {} holds none: run it \
             in a source checkout (or set FRACTOS_WORKSPACE to one)",
            Workspace::locate().root.display()
        )
    })?;
    let out = out.unwrap_or_else(|| ws.images_dir());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "building kernel (cargo, target dir {})",
        ws.kernel_target().display()
    );
    let built = build::build_kernel(&ws)?;
    let elf = out.join("fractos-kernel.elf");
    std::fs::copy(&built, &elf).with_context(|| format!("copying to {}", elf.display()))?;
    eprintln!("building ISO (grub-mkrescue)");
    let modules: Vec<build::IsoModule> = key_file
        .map(|f| -> anyhow::Result<build::IsoModule> {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            fractos_hosted::parse_key(&text)
                .with_context(|| format!("{} is not a key file", f.display()))?;
            Ok(build::IsoModule {
                file: f.to_path_buf(),
                cmdline: "fractos-cluster-key".into(),
            })
        })
        .transpose()?
        .into_iter()
        .collect();
    let iso = build::build_iso_with_modules(&elf, cmdline, &modules, &out.join("fractos.iso"))?;
    Ok(Images {
        elf_bytes: build::file_size(&elf)?,
        iso_bytes: build::file_size(&iso)?,
        elf,
        iso,
    })
}

/// Runs `fractos image ...`.
pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(a) => {
            let i = build_images(a.out, &a.cmdline, a.key_file.as_deref())?;
            println!(
                "PVH ELF  {}  {} ({} bytes)",
                i.elf.display(),
                human_bytes(i.elf_bytes),
                i.elf_bytes
            );
            println!(
                "GRUB ISO {}  {} ({} bytes)",
                i.iso.display(),
                human_bytes(i.iso_bytes),
                i.iso_bytes
            );
            Ok(())
        }
    }
}
