#!/bin/bash
# tamis on SLURM: a RELION queue template (job option qsubscript) for jobs with nr_mpi ranks.
# RELION's fields (XXX...XXX) are filled in by tamis; the command field starts one torchrun agent, which starts this
# node's share of the nr_mpi ranks (nr_mpi / nodes; one per GPU) and meets the other nodes'
# agents at TAMIS_RDZV_ENDPOINT. Jobs without ranks run their one process the same way.
#SBATCH --job-name=tamis-XXXnameXXX
#SBATCH --partition=XXXqueueXXX
#SBATCH --nodes=XXXnodesXXX
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=XXXdedicatedXXX
#SBATCH --output=XXXoutfileXXX
#SBATCH --error=XXXerrfileXXX
# GPUs per node, e.g. qsub_extra1 = "--gpus-per-node=4" (RELION's "Additional argument")
#SBATCH XXXextra1XXX

# the rendezvous lives on the first node of the allocation
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export TAMIS_RDZV_ENDPOINT="$head:29500"
export OMP_NUM_THREADS=XXXthreadsXXX

srun --ntasks-per-node=1 bash -c "XXXcommandXXX"
