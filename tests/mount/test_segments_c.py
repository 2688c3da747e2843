"""Segments through volfs.h's C API, compiled as C99 and as C++11, against a real mount.

One program (:data:`SOURCE`) is compiled both ways with every warning an error
(``cc -std=c99 -Wall -Wextra -pedantic -Werror``, ``c++ -std=c++11 -Wall -Wextra -Werror``).
Each test runs one of its modes against a fresh volfs and compares what it printed with what a
user of the header must see through the kernel: which segments a pin reports purged, what
reading their bytes gives before and after the pin, which calls fail and with which errno.
Mounts run with ``pressure=off``, so that nothing but the programs' own purges takes anything."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Mount
from volfs import abi
from volfs.client import SegmentTable, purge, vrange_status

PAGE = 4096
#: Pages of the programs' segments, and their bytes.
SEGMENT_PAGES = 4
SEGMENT = SEGMENT_PAGES * PAGE
#: Seconds a program may take (it waits up to 10 s for a table to turn STALE).
PROGRAM_TIMEOUT = 30.0
#: Seconds a purge of a few segments may take before the daemon counts as stuck.
PURGE_TIMEOUT = 5.0
#: Options of every mount: no purge but the programs' own.
OPTIONS = "size=256M,pressure=off"

COMPILERS = {
    "c99": ["cc", "-x", "c", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2"],
    "c++11": ["c++", "-x", "c++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-O2"],
}

SOURCE = r"""
/*
 * segments.c - volfs segments as a C (or C++) program sees them through the kernel.
 *
 * Usage: segments MODE FILE [ARG]. FILE is created on the volfs mount under test; every mode
 * prints "key value..." lines for the test to compare, and exits 0. A call that fails when it
 * should not prints "FAILED what: ERRNO" and exits 1. Pages of FILE hold the byte 'a' + page % 26,
 * so a read tells data ('D') from zeros ('Z'), EIO ('E') and anything else ('M', or '?' for
 * another error).
 */
#include <volfs.h>

#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>

#define PAGE VOLFS_PAGE_SIZE
#define SEGMENT_PAGES 4u
#define SEGMENT_BYTES (SEGMENT_PAGES * PAGE)
#define MAX_SEGMENTS 64u
#define STALE_WAIT_SECONDS 10
#define NOBODY 65534

static const char *name_of(int error)
{
    static char number[16];

    switch (error) {
    case 0: return "ok";
    case EACCES: return "EACCES";
    case EBADF: return "EBADF";
    case EBUSY: return "EBUSY";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case EISDIR: return "EISDIR";
    case ENOENT: return "ENOENT";
    case ENOSPC: return "ENOSPC";
    case ENOTTY: return "ENOTTY";
    case EPERM: return "EPERM";
    case ESTALE: return "ESTALE";
    default:
        snprintf(number, sizeof(number), "errno%d", error);
        return number;
    }
}

/* "ok" for a call that returned 0, else the name of its errno. */
static const char *outcome(int rc)
{
    return rc == 0 ? "ok" : name_of(errno);
}

static void check(int ok, const char *what)
{
    if (!ok) {
        printf("FAILED %s: %s\n", what, name_of(errno));
        exit(1);
    }
}

static int open_file(const char *path, int flags)
{
    int fd = open(path, flags | O_CLOEXEC, 0644);
    check(fd >= 0, "open");
    return fd;
}

static void pattern(unsigned char *page, unsigned index)
{
    memset(page, 'a' + (int)(index % 26), PAGE);
}

/* Write pages [first, first + count) of the file with their pattern. */
static void fill(int fd, unsigned first, unsigned count)
{
    unsigned char page[PAGE];
    unsigned i;

    for (i = first; i < first + count; i++) {
        pattern(page, i);
        check(pwrite(fd, page, PAGE, (off_t)i * PAGE) == PAGE, "pwrite");
    }
}

/* What reading pages [first, first + count) gives: 'D', 'Z', 'E', 'M' or '?'. */
static char look(int fd, unsigned first, unsigned count)
{
    unsigned char got[PAGE], want[PAGE], zeros[PAGE];
    unsigned i;
    int data = 1, zero = 1;

    memset(zeros, 0, PAGE);
    for (i = first; i < first + count; i++) {
        ssize_t n = pread(fd, got, PAGE, (off_t)i * PAGE);
        if (n < 0)
            return errno == EIO ? 'E' : '?';
        if (n != PAGE)
            return 'M';
        pattern(want, i);
        data = data && memcmp(got, want, PAGE) == 0;
        zero = zero && memcmp(got, zeros, PAGE) == 0;
    }
    return data ? 'D' : zero ? 'Z' : 'M';
}

/* Print what reading each of `count` segments of SEGMENT_PAGES pages gives. */
static void print_looks(const char *key, int fd, unsigned count)
{
    unsigned i;

    printf("%s ", key);
    for (i = 0; i < count; i++)
        putchar(look(fd, i * SEGMENT_PAGES, SEGMENT_PAGES));
    putchar('\n');
}

/* Print what reading each of `count` single pages gives. */
static void print_pages(const char *key, int fd, unsigned count)
{
    unsigned i;

    printf("%s ", key);
    for (i = 0; i < count; i++)
        putchar(look(fd, i, 1));
    putchar('\n');
}

/* VOLFS_IOC_PURGE of at least `bytes` (0: all volatile data); returns the bytes purged. */
static unsigned long long purge(int fd, unsigned long long bytes)
{
    struct volfs_purge request;

    memset(&request, 0, sizeof(request));
    request.bytes = bytes;
    check(ioctl(fd, VOLFS_IOC_PURGE, &request) == 0, "VOLFS_IOC_PURGE");
    return (unsigned long long)request.purged;
}

static void print_status(int fd)
{
    struct vrange_status status;

    memset(&status, 0, sizeof(status));
    check(ioctl(fd, VOLFS_IOC_VRANGE_STATUS, &status) == 0, "VOLFS_IOC_VRANGE_STATUS");
    printf("status %llu %llu\n", (unsigned long long)status.volatile_bytes,
           (unsigned long long)status.purged_bytes);
}

/* VOLFS_IOC_VRANGE over pages [first, first + count); 0 or -1 with errno, *purged set. */
static int vrange(int fd, unsigned first, unsigned count, __u32 mode, __u32 *purged)
{
    struct vrange_args args;

    memset(&args, 0, sizeof(args));
    args.start = (__u64)first * PAGE;
    args.length = (__u64)count * PAGE;
    args.mode = mode;
    args.flags = VRANGE_FULL;
    if (ioctl(fd, VOLFS_IOC_VRANGE, &args) < 0)
        return -1;
    if (purged != NULL)
        *purged = args.purged;
    return 0;
}

static void open_table(int fd, __u32 capacity, struct volfs_segment_table *table)
{
    check(volfs_segments_open(fd, capacity, table) == 0, "volfs_segments_open");
}

/* Register pages [first, first + count) as a segment; its index. */
static __u32 add(int fd, unsigned first, unsigned count, __u32 flags)
{
    __u32 index = 0;

    check(volfs_segment_register(fd, (__u64)first * PAGE, (__u64)count * PAGE, flags, &index)
              == 0,
          "volfs_segment_register");
    return index;
}

/* The outcome of registering a span given in bytes. */
static const char *try_add(int fd, __u64 start, __u64 length, __u32 flags)
{
    __u32 index;

    return outcome(volfs_segment_register(fd, start, length, flags, &index));
}

/* Print the state of each segment, one digit each. */
static void print_states(const char *key, const struct volfs_segment_table *table,
                         const __u32 *segments, unsigned count)
{
    unsigned i;

    printf("%s ", key);
    for (i = 0; i < count; i++)
        printf("%d", volfs_segment_state(table, segments[i]));
    putchar('\n');
}

/* Pin each segment and print what it reported: 1 purged, 0 not, or the errno's name. */
static void print_pins(const char *key, const struct volfs_segment_table *table,
                       const __u32 *segments, unsigned count)
{
    unsigned i;
    int purged;

    printf("%s ", key);
    for (i = 0; i < count; i++) {
        purged = -1;
        if (volfs_segment_pin(table, segments[i], &purged) == 0)
            printf("%d", purged);
        else
            printf("%s%s", i ? "," : "", name_of(errno));
    }
    putchar('\n');
}

static void unpin(const struct volfs_segment_table *table, __u32 segment)
{
    check(volfs_segment_unpin(table, segment) == 0, "volfs_segment_unpin");
}

/* Register `count` segments of SEGMENT_PAGES pages from page 0 on, FULL. */
static void add_all(int fd, __u32 *segments, unsigned count)
{
    unsigned i;

    for (i = 0; i < count; i++)
        segments[i] = add(fd, i * SEGMENT_PAGES, SEGMENT_PAGES, VRANGE_FULL);
}

/* Unpin a segment strictly later than the last unpin before it, so that the purge order is
 * the order of the calls (stamps are CLOCK_MONOTONIC nanoseconds). */
static void unpin_after(const struct volfs_segment_table *table, __u32 segment, __u64 *last)
{
    struct timespec now;

    do
        clock_gettime(CLOCK_MONOTONIC, &now);
    while ((__u64)now.tv_sec * 1000000000u + (__u64)now.tv_nsec <= *last);
    unpin(table, segment);
    *last = volfs_segment__slot(table, segment)->stamp;
}

/* A pin/unpin cycle: only unpinned segments are purged, pins say which, data reads back. */
static int mode_cycle(const char *path)
{
    enum { COUNT = 12 };
    struct volfs_segment_table table;
    const struct volfs_segment_table_header *header;
    __u32 segments[COUNT];
    unsigned i, j, good = 1;
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC);

    fill(fd, 0, COUNT * SEGMENT_PAGES);
    open_table(fd, 32, &table);
    header = (const struct volfs_segment_table_header *)table.base;
    printf("table %u %d %x %u %u %u\n", table.capacity, table.writable, header->magic,
           header->version, header->capacity, header->slot_size);
    add_all(fd, segments, COUNT);
    for (i = 0; i < COUNT; i++) {
        const struct volfs_segment_slot *slot = volfs_segment__slot(&table, segments[i]);
        good = good && segments[i] < table.capacity && slot->flags == VRANGE_FULL
               && slot->start == (__u64)i * SEGMENT_BYTES && slot->length == SEGMENT_BYTES;
        for (j = 0; j < i; j++)
            good = good && segments[j] != segments[i];
    }
    printf("slots %s\n", good ? "as registered" : "WRONG");
    print_states("registered", &table, segments, COUNT);
    for (i = 0; i < COUNT; i += 3)
        unpin(&table, segments[i]);
    print_states("unpinned", &table, segments, COUNT);
    print_status(fd);
    print_looks("before", fd, COUNT);
    printf("purged %llu\n", purge(fd, 0));
    print_states("after", &table, segments, COUNT);
    print_status(fd);
    print_looks("read", fd, COUNT);
    print_pins("pins", &table, segments, COUNT);
    print_states("pinned", &table, segments, COUNT);
    print_status(fd);
    print_looks("read", fd, COUNT);

    /* Unpinned and pinned again with no purge between: nothing to report, nothing lost. */
    for (i = 0; i < COUNT; i++)
        unpin(&table, segments[i]);
    print_pins("pins", &table, segments, COUNT);
    print_looks("read", fd, COUNT);

    /* A new cycle reports its own purge only. */
    fill(fd, 0, COUNT * SEGMENT_PAGES);
    for (i = 1; i < COUNT; i += 3)
        unpin(&table, segments[i]);
    printf("purged %llu\n", purge(fd, 0));
    print_pins("pins", &table, segments, COUNT);
    print_looks("read", fd, COUNT);
    volfs_segments_close(&table);
    close(fd);
    return 0;
}

/* Least recently unpinned first; a PARTIAL segment gives only as many pages as asked for. */
static int mode_order(const char *path)
{
    enum { COUNT = 4 };
    struct volfs_segment_table table;
    __u32 segments[COUNT];
    __u64 last = 0;
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC);
    int round;

    fill(fd, 0, COUNT * SEGMENT_PAGES);
    open_table(fd, 0, &table);
    printf("capacity %u\n", table.capacity);
    segments[0] = add(fd, 0, SEGMENT_PAGES, VRANGE_FULL);
    segments[1] = add(fd, SEGMENT_PAGES, SEGMENT_PAGES, VRANGE_FULL);
    segments[2] = add(fd, 2 * SEGMENT_PAGES, SEGMENT_PAGES, VRANGE_FULL);
    segments[3] = add(fd, 3 * SEGMENT_PAGES, SEGMENT_PAGES, VRANGE_PARTIAL);
    unpin_after(&table, segments[2], &last);
    unpin_after(&table, segments[0], &last);
    unpin_after(&table, segments[3], &last);
    unpin_after(&table, segments[1], &last);
    print_states("unpinned", &table, segments, COUNT);
    for (round = 0; round < 3; round++) {
        printf("purged %llu ", purge(fd, PAGE));
        print_states("states", &table, segments, COUNT);
    }
    print_pins("pins", &table, segments, COUNT);
    print_pages("pages", fd, COUNT * SEGMENT_PAGES);
    volfs_segments_close(&table);
    close(fd);
    return 0;
}

/* The rest of a PARTIAL segment a purge took the tail of is still volatile: a purge of
 * everything takes it too, as it takes the rest of a VRANGE_PARTIAL range. */
static int mode_partial_rest(const char *path)
{
    struct volfs_segment_table table;
    __u32 segment;
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC);

    fill(fd, 0, SEGMENT_PAGES);
    open_table(fd, 0, &table);
    segment = add(fd, 0, SEGMENT_PAGES, VRANGE_PARTIAL);
    unpin(&table, segment);
    printf("tail %llu\n", purge(fd, PAGE));
    print_status(fd);
    printf("rest %llu\n", purge(fd, 0));
    print_pins("pins", &table, &segment, 1);
    print_pages("pages", fd, SEGMENT_PAGES);
    volfs_segments_close(&table);
    close(fd);
    return 0;
}

/* Unpin some, say "ready", wait for a line on stdin (the test purges meanwhile), pin. */
static int mode_wait(const char *path)
{
    enum { COUNT = 4 };
    struct volfs_segment_table table;
    __u32 segments[COUNT];
    char line[16];
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC);

    fill(fd, 0, COUNT * SEGMENT_PAGES);
    open_table(fd, 0, &table);
    add_all(fd, segments, COUNT);
    unpin(&table, segments[0]);
    unpin(&table, segments[2]);
    printf("ready %u %u %u %u\n", segments[0], segments[1], segments[2], segments[3]);
    fflush(stdout);
    check(fgets(line, sizeof(line), stdin) != NULL, "reading stdin");
    print_states("states", &table, segments, COUNT);
    print_looks("read", fd, COUNT);
    print_pins("pins", &table, segments, COUNT);
    print_looks("read", fd, COUNT);
    volfs_segments_close(&table);
    close(fd);
    return 0;
}

/* The table outlives a descriptor, not the file's last close. */
static int mode_stale(const char *path)
{
    enum { COUNT = 3 };
    struct volfs_segment_table table, fresh;
    __u32 segments[COUNT], purged = 9, index;
    struct timespec deadline, now;
    int first = open_file(path, O_RDWR | O_CREAT | O_TRUNC), second, again, pin_purged = -1;

    second = open_file(path, O_RDWR);
    fill(first, 0, COUNT * SEGMENT_PAGES);
    open_table(first, 8, &table);
    segments[0] = add(first, 0, SEGMENT_PAGES, VRANGE_FULL);
    segments[1] = add(first, SEGMENT_PAGES, SEGMENT_PAGES, VRANGE_FULL);
    unpin(&table, segments[0]);
    printf("purged %llu\n", purge(second, 0));
    close(first);

    /* Another descriptor is open: the table lives on. */
    printf("register %s\n",
           outcome(volfs_segment_register(second, 2 * SEGMENT_BYTES, SEGMENT_BYTES, VRANGE_FULL,
                                          &segments[2])));
    printf("pin %s", outcome(volfs_segment_pin(&table, segments[1], &pin_purged)));
    printf(" %d\n", pin_purged);
    printf("unpin %s\n", outcome(volfs_segment_unpin(&table, segments[1])));
    close(second);

    /* The last close: FUSE sends RELEASE after close(2) returned, so wait for the word. */
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += STALE_WAIT_SECONDS;
    do
        clock_gettime(CLOCK_MONOTONIC, &now);
    while (volfs_segment_state(&table, segments[1]) != VOLFS_SEGMENT_STALE
           && (now.tv_sec < deadline.tv_sec
               || (now.tv_sec == deadline.tv_sec && now.tv_nsec < deadline.tv_nsec)));
    print_states("closed", &table, segments, COUNT);
    print_pins("pins", &table, segments, COUNT);
    printf("unpin %s\n", outcome(volfs_segment_unpin(&table, segments[1])));
    volfs_segments_close(&table);

    /* What was purged stays lost; what was not stays, and is not purged any more. */
    again = open_file(path, O_RDWR);
    print_looks("read", again, COUNT);
    printf("purged %llu\n", purge(again, 0));
    print_looks("read", again, COUNT);
    open_table(again, 0, &fresh);
    print_states("fresh", &fresh, segments, COUNT);
    printf("register %s\n", try_add(again, 0, SEGMENT_BYTES, VRANGE_FULL));
    check(vrange(again, 0, SEGMENT_PAGES, VRANGE_NONVOLATILE, &purged) == 0, "vrange");
    printf("unmarked %u\n", purged);
    printf("register %s\n",
           outcome(volfs_segment_register(again, 0, SEGMENT_BYTES, VRANGE_FULL, &index)));
    print_looks("read", again, COUNT);
    volfs_segments_close(&fresh);
    close(again);
    return 0;
}

/* A table obtained through a read-only descriptor shows the states and changes nothing. */
static int mode_readonly(const char *path)
{
    enum { COUNT = 2 };
    struct volfs_segment_table writer, reader;
    __u32 segments[COUNT];
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC), ro, status = 0, purged = -1;
    pid_t child;

    fill(fd, 0, 3 * SEGMENT_PAGES);
    open_table(fd, 8, &writer);
    add_all(fd, segments, COUNT);
    unpin(&writer, segments[0]);
    ro = open_file(path, O_RDONLY);
    open_table(ro, 0, &reader);
    printf("writable %d %d\n", writer.writable, reader.writable);
    printf("capacity %u %u\n", writer.capacity, reader.capacity);
    print_states("reader", &reader, segments, COUNT);
    printf("pin %s", outcome(volfs_segment_pin(&reader, segments[1], &purged)));
    printf(" unpin %s\n", outcome(volfs_segment_unpin(&reader, segments[1])));
    printf("register %s\n", try_add(ro, 2 * SEGMENT_BYTES, SEGMENT_BYTES, VRANGE_FULL));
    printf("release %s\n", outcome(volfs_segment_release(ro, segments[0])));
    printf("mprotect %s\n",
           outcome(mprotect(reader.base, reader.size, PROT_READ | PROT_WRITE)));
    fflush(stdout);
    child = fork();
    check(child >= 0, "fork");
    if (child == 0) {
        struct rlimit no_core;

        no_core.rlim_cur = no_core.rlim_max = 0;  /* the SIGSEGV expected leaves no core file */
        setrlimit(RLIMIT_CORE, &no_core);
        __atomic_store_n(&volfs_segment__slot(&reader, segments[1])->state,
                         (__u32)VOLFS_SEGMENT_UNPINNED, __ATOMIC_RELEASE);
        _exit(0);
    }
    check(waitpid(child, &status, 0) == child, "waitpid");
    printf("store %s\n", WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV ? "SIGSEGV"
                         : "went through");
    print_states("reader", &reader, segments, COUNT);

    /* The writer's changes show through the reader's table. */
    check(volfs_segment_pin(&writer, segments[0], &purged) == 0, "pin");
    unpin(&writer, segments[1]);
    print_states("reader", &reader, segments, COUNT);
    printf("purged %llu\n", purge(ro, 0));
    print_states("reader", &reader, segments, COUNT);
    print_states("writer", &writer, segments, COUNT);
    volfs_segments_close(&reader);
    volfs_segments_close(&writer);
    close(ro);
    close(fd);
    return 0;
}

/* Another process gets the same table by itself and changes the same words. */
static int mode_share(const char *path)
{
    enum { COUNT = 2 };
    struct volfs_segment_table table;
    __u32 segments[COUNT];
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC), round, status;
    pid_t child;

    fill(fd, 0, COUNT * SEGMENT_PAGES);
    open_table(fd, 16, &table);
    add_all(fd, segments, COUNT);
    for (round = 0; round < 2; round++) {
        fflush(stdout);
        child = fork();
        check(child >= 0, "fork");
        if (child == 0) {
            struct volfs_segment_table own;
            int own_fd = open_file(path, O_RDWR);
            __u64 last = 0;

            open_table(own_fd, 4, &own);
            printf("child capacity %u\n", own.capacity);
            if (round == 0) {
                unpin_after(&own, segments[0], &last);
                unpin_after(&own, segments[1], &last);
            } else {
                print_pins("child pins", &own, segments, COUNT);
            }
            fflush(stdout);
            _exit(0);
        }
        check(waitpid(child, &status, 0) == child && WIFEXITED(status)
                  && WEXITSTATUS(status) == 0,
              "the child");
        print_states("parent", &table, segments, COUNT);
        if (round == 0)
            printf("purged %llu\n", purge(fd, PAGE));
    }
    print_looks("read", fd, COUNT);
    volfs_segments_close(&table);
    close(fd);
    return 0;
}

/* The errors of registering, releasing, pinning and opening a table. */
static int mode_errors(const char *path, const char *elsewhere)
{
    struct volfs_segment_table table;
    __u32 a, b, index;
    char directory[4096];
    char *slash;
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC), other, pin_purged;

    fill(fd, 0, 16);
    printf("no table %s\n", try_add(fd, 0, PAGE, VRANGE_FULL));
    other = open_file(path, O_RDONLY);
    printf("reader %s\n", outcome(volfs_segments_open(other, 0, &table)));
    close(other);
    printf("capacity %s\n",
           outcome(volfs_segments_open(fd, VOLFS_SEGMENTS_PER_FILE_MAX + 1u, &table)));
    snprintf(directory, sizeof(directory), "%s", path);
    slash = strrchr(directory, '/');
    check(slash != NULL, "a path with a directory");
    *slash = '\0';
    other = open_file(directory, O_RDONLY | O_DIRECTORY);
    printf("directory %s\n", outcome(volfs_segments_open(other, 0, &table)));
    close(other);
    other = open_file(elsewhere, O_RDONLY);
    printf("elsewhere %s\n", outcome(volfs_segments_open(other, 0, &table)));
    close(other);

    open_table(fd, 3, &table);
    printf("invalid %s", try_add(fd, 1, PAGE, VRANGE_FULL));
    printf(" %s", try_add(fd, 0, PAGE + 1, VRANGE_FULL));
    printf(" %s", try_add(fd, 0, 0, VRANGE_FULL));
    printf(" %s", try_add(fd, 16 * PAGE, PAGE, VRANGE_FULL));
    printf(" %s", try_add(fd, 0, PAGE, 2));
    printf(" %s\n", try_add(fd, ~(__u64)0 - PAGE + 1, 2 * PAGE, VRANGE_FULL));
    a = add(fd, 0, 4, VRANGE_FULL);
    printf("overlap %s", try_add(fd, 2 * PAGE, 4 * PAGE, VRANGE_FULL));
    printf(" %s", try_add(fd, 3 * PAGE, PAGE, VRANGE_FULL));
    printf(" %s\n", try_add(fd, 0, 16 * PAGE, VRANGE_PARTIAL));
    check(vrange(fd, 8, 1, VRANGE_VOLATILE, NULL) == 0, "marking page 8 volatile");
    printf("over a range %s\n", try_add(fd, 8 * PAGE, PAGE, VRANGE_FULL));
    printf("vrange over a segment %s\n", outcome(vrange(fd, 3, 2, VRANGE_VOLATILE, NULL)));
    b = add(fd, 4, 4, VRANGE_FULL);
    (void)add(fd, 12, 4, VRANGE_PARTIAL);
    printf("full %s\n", try_add(fd, 9 * PAGE, PAGE, VRANGE_FULL));
    printf("release %s", outcome(volfs_segment_release(fd, 7)));
    printf(" %s", outcome(volfs_segment_release(fd, b)));
    printf(" %s\n", outcome(volfs_segment_release(fd, b)));
    printf("released %d", volfs_segment_state(&table, b));
    printf(" pin %s", outcome(volfs_segment_pin(&table, b, &pin_purged)));
    printf(" unpin %s\n", outcome(volfs_segment_unpin(&table, b)));
    printf("past the table %d", volfs_segment_state(&table, table.capacity));
    printf(" %s", name_of(errno));
    printf(" pin %s", outcome(volfs_segment_pin(&table, table.capacity, &pin_purged)));
    printf(" unpin %s\n", outcome(volfs_segment_unpin(&table, table.capacity)));
    index = add(fd, 9, 1, VRANGE_FULL);
    printf("reused %s\n", index == b ? "yes" : "no");
    printf("untouched %d\n", volfs_segment_state(&table, a));
    volfs_segments_close(&table);
    close(fd);
    return 0;
}

/* A read-only table must stay read-only for a user who holds its memfd: reopening it through
 * /proc/self/fd for writing must fail. Root gets the token, then acts as nobody. */
static int mode_reopen(const char *path)
{
    struct volfs_segments_args args;
    struct volfs_segment_table table;
    char link[64];
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC), ro, memfd, reopened;

    fill(fd, 0, SEGMENT_PAGES);
    open_table(fd, 0, &table);  /* made by a writer: a reader only gets one that exists */
    ro = open_file(path, O_RDONLY);
    memset(&args, 0, sizeof(args));
    check(ioctl(ro, VOLFS_IOC_SEGMENTS, &args) == 0, "VOLFS_IOC_SEGMENTS");
    memfd = volfs_segments__receive(&args);
    check(memfd >= 0, "receiving the table");
    printf("handed %s\n", (fcntl(memfd, F_GETFL) & O_ACCMODE) == O_RDONLY ? "read-only"
                          : "writable");
    check(setgroups(0, NULL) == 0 && setgid(NOBODY) == 0 && setuid(NOBODY) == 0,
          "becoming nobody");
    snprintf(link, sizeof(link), "/proc/self/fd/%d", memfd);
    reopened = open(link, O_RDWR);
    printf("reopen %s\n", outcome(reopened < 0 ? -1 : 0));
    return 0;
}

/* Unpinned segments wholly past the end of the file (truncated away) must not stall a purge. */
static int mode_past_eof(const char *path, const char *count_text)
{
    struct volfs_segment_table table, other_table;
    char other_path[4096];
    unsigned count = (unsigned)strtoul(count_text, NULL, 10), i;
    __u32 index;
    int fd = open_file(path, O_RDWR | O_CREAT | O_TRUNC), other;

    fill(fd, 0, count);
    open_table(fd, count, &table);
    for (i = 0; i < count; i++)
        unpin(&table, add(fd, i, 1, VRANGE_FULL));
    check(ftruncate(fd, 0) == 0, "ftruncate");
    snprintf(other_path, sizeof(other_path), "%s.other", path);
    other = open_file(other_path, O_RDWR | O_CREAT | O_TRUNC);
    fill(other, 0, 1);
    open_table(other, 0, &other_table);
    index = add(other, 0, 1, VRANGE_FULL);
    unpin(&other_table, index);
    printf("purging\n");
    fflush(stdout);
    printf("purged %llu\n", purge(other, 0));
    print_states("other", &other_table, &index, 1);
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 2 ? argv[1] : "";
    const char *path = argc > 2 ? argv[2] : "";

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(mode, "cycle") == 0)
        return mode_cycle(path);
    if (strcmp(mode, "order") == 0)
        return mode_order(path);
    if (strcmp(mode, "partial-rest") == 0)
        return mode_partial_rest(path);
    if (strcmp(mode, "wait") == 0)
        return mode_wait(path);
    if (strcmp(mode, "stale") == 0)
        return mode_stale(path);
    if (strcmp(mode, "readonly") == 0)
        return mode_readonly(path);
    if (strcmp(mode, "share") == 0)
        return mode_share(path);
    if (strcmp(mode, "errors") == 0)
        return mode_errors(path, argv[0]);
    if (strcmp(mode, "reopen") == 0)
        return mode_reopen(path);
    if (strcmp(mode, "past-eof") == 0 && argc > 3)
        return mode_past_eof(path, argv[3]);
    fprintf(stderr, "usage: %s MODE FILE [COUNT]\n", argv[0]);
    return 2;
}
"""


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """:data:`SOURCE` compiled by each of :data:`COMPILERS` (a compiler error fails the test)."""
    directory = tmp_path_factory.mktemp("segments_c")
    source = directory / "segments.c"
    source.write_text(SOURCE)
    include = Path(abi.__file__).parent / "include"
    built = {}
    for language, command in COMPILERS.items():
        if shutil.which(command[0]) is None:
            pytest.skip(f"no {command[0]} to compile {language}")
        binary = directory / f"segments-{language}"
        result = subprocess.run(
            [*command, "-I", str(include), "-o", str(binary), str(source)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, f"{language} does not compile:\n{result.stderr}"
        assert result.stderr == "", result.stderr
        built[language] = str(binary)
    return built


@pytest.fixture(params=list(COMPILERS))
def program(request: pytest.FixtureRequest, binaries: dict[str, str]) -> str:
    """The program, compiled as C99 and, in a second run of the test, as C++11."""
    return binaries[request.param]


@pytest.fixture
def c_program(binaries: dict[str, str]) -> str:
    """The program compiled as C99 only."""
    return binaries["c99"]


@pytest.fixture
def vol(mount_volfs: Callable[..., Mount]) -> Mount:
    """A fresh volfs that purges only on request."""
    return mount_volfs(OPTIONS)


def run(program: str, *args: str | Path) -> list[str]:
    """Run the program; its output lines, once it exited 0."""
    result = subprocess.run(
        [program, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"status {result.returncode}\n{result.stdout}{result.stderr}"
    return result.stdout.splitlines()


def test_pins_report_exactly_the_purged_segments(vol: Mount, program: str) -> None:
    # Twelve segments of four pages; every third one unpinned, then everything purged.
    volatile = 4 * SEGMENT
    assert run(program, "cycle", vol.path / "cycle.bin") == [
        f"table 32 1 {abi.SEGMENT_TABLE_MAGIC:x} {abi.SEGMENT_TABLE_VERSION} 32 "
        f"{abi.SEGMENT_SLOT.size}",
        "slots as registered",
        "registered 111111111111",  # registered pinned
        "unpinned 211211211211",
        f"status {volatile} 0",  # unpinned segments are volatile bytes of the file
        "before DDDDDDDDDDDD",  # volatile, not purged: intact
        f"purged {volatile}",  # only the unpinned ones, though everything was asked for
        "after 411411411411",
        f"status {volatile} {volatile}",
        "read EDDEDDEDDEDD",  # purged bytes fail with EIO until the pin; pinned ones survive
        "pins 100100100100",  # purged=1 for exactly the purged segments
        "pinned 111111111111",
        "status 0 0",
        "read ZDDZDDZDDZDD",  # purged bytes read as zeros once a pin reported them
        "pins 000000000000",  # unpinned and pinned again, nothing purged between
        "read ZDDZDDZDDZDD",
        f"purged {volatile}",  # rewritten, another third unpinned and purged
        "pins 010010010010",  # the pins report this purge only
        "read DZDDZDDZDDZD",
    ]


def test_the_least_recently_unpinned_go_first(vol: Mount, program: str) -> None:
    # Segments 0-2 FULL, 3 PARTIAL, unpinned in the order 2, 0, 3, 1; each purge asks for a
    # page: a FULL segment goes whole, the PARTIAL one gives its last page only.
    assert run(program, "order", vol.path / "order.bin") == [
        f"capacity {abi.SEGMENTS_DEFAULT}",
        "unpinned 2222",
        f"purged {SEGMENT} states 2242",
        f"purged {SEGMENT} states 4242",
        f"purged {PAGE} states 4244",
        "pins 1011",
        "pages ZZZZDDDDZZZZDDDZ",
    ]


def test_a_purge_from_another_process_is_what_the_pins_report(vol: Mount, program: str) -> None:
    path = vol.path / "wait.bin"
    with subprocess.Popen(
        [program, "wait", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        ready, *indices = child.stdout.readline().split()
        assert ready == "ready", f"{ready} {indices}"  # segments 0 and 2 of 4 unpinned
        fd = os.open(path, os.O_RDONLY)
        try:
            assert vrange_status(fd) == (2 * SEGMENT, 0)
            assert purge(vol.path) == 2 * SEGMENT
            assert vrange_status(fd) == (2 * SEGMENT, 2 * SEGMENT)
            with SegmentTable(fd) as table:  # the same table, read-only here
                assert not table.writable
                assert [table.state(int(index)) for index in indices] == [
                    abi.SEGMENT_PURGED,
                    abi.SEGMENT_PINNED,
                    abi.SEGMENT_PURGED,
                    abi.SEGMENT_PINNED,
                ]
                output, errors = child.communicate("go\n", timeout=PROGRAM_TIMEOUT)
                assert child.returncode == 0, f"{output}{errors}"
                assert output.splitlines() == [
                    "states 4141",
                    "read EDED",
                    "pins 1010",
                    "read ZDZD",
                ]
                assert [table.state(int(index)) for index in indices] == [abi.SEGMENT_PINNED] * 4
            assert vrange_status(fd) == (0, 0)
            assert os.pread(fd, SEGMENT, 0) == bytes(SEGMENT)
        finally:
            os.close(fd)


def test_the_table_ends_with_the_files_last_close(vol: Mount, program: str) -> None:
    assert run(program, "stale", vol.path / "stale.bin") == [
        f"purged {SEGMENT}",  # segment 0 unpinned and purged; segment 1 pinned
        # The first descriptor is closed, the second keeps the table alive.
        "register ok",
        "pin ok 0",
        "unpin ok",  # segment 1 is left unpinned at the last close
        # The last close: every word STALE, pin and unpin fail.
        f"closed {str(abi.SEGMENT_STALE) * 3}",
        "pins ESTALE,ESTALE,ESTALE",
        "unpin ESTALE",
        # Reopened: the purge nobody was told of still fails with EIO; the rest is intact and
        # no longer volatile.
        "read EDD",
        "purged 0",
        "read EDD",
        # A new table; registering over the unreported purge waits for an unmark to report it.
        "fresh 000",
        "register EBUSY",
        "unmarked 1",
        "register ok",
        "read ZDD",
    ]


def test_a_read_only_descriptor_gets_a_read_only_table(vol: Mount, program: str) -> None:
    assert run(program, "readonly", vol.path / "readonly.bin") == [
        "writable 1 0",
        "capacity 8 8",  # one table: the file's
        "reader 21",
        "pin EBADF unpin EBADF",
        "register EBADF",
        "release EBADF",
        "mprotect EACCES",  # the mapping cannot be made writable
        "store SIGSEGV",  # nor written to
        "reader 21",
        "reader 12",  # the writer pinned 0 and unpinned 1
        f"purged {SEGMENT}",
        "reader 14",
        "writer 14",
    ]


def test_another_process_gets_the_same_table(vol: Mount, program: str) -> None:
    assert run(program, "share", vol.path / "share.bin") == [
        "child capacity 16",  # the file's table, not one of the 4 slots the child asked for
        "parent 22",  # the child unpinned 0, then 1
        f"purged {SEGMENT}",  # one page asked for: the older one
        "child capacity 16",
        "child pins 10",  # a second child pins what the first unpinned
        "parent 11",
        "read ZD",
    ]


def test_errors_of_registering_releasing_and_pinning(vol: Mount, program: str) -> None:
    assert run(program, "errors", vol.path / "errors.bin") == [
        "no table ENOENT",
        "reader ENOENT",  # a read-only descriptor never makes a table
        "capacity EINVAL",  # past VOLFS_SEGMENTS_PER_FILE_MAX
        "directory EISDIR",
        "elsewhere ENOTTY",  # not a volfs file
        # Unaligned start, unaligned length, empty, past the end, unknown flag, overflowing.
        "invalid EINVAL EINVAL EINVAL EINVAL EINVAL EINVAL",
        "overlap EBUSY EBUSY EBUSY",
        "over a range EBUSY",
        "vrange over a segment EBUSY",
        "full ENOSPC",  # a table of 3 slots
        "release EINVAL ok EINVAL",  # no such slot, the segment, the same one again
        f"released {abi.SEGMENT_FREE} pin EINVAL unpin EINVAL",
        "past the table -1 EINVAL pin EINVAL unpin EINVAL",
        "reused yes",
        f"untouched {abi.SEGMENT_PINNED}",
    ]


# -- once bugs: the rest of a partial segment, read-only tables, segments past EOF ----------


def test_the_rest_of_a_partial_segment_stays_purgeable(vol: Mount, c_program: str) -> None:
    output = run(c_program, "partial-rest", vol.path / "partial.bin")
    assert output[:2] == [f"tail {PAGE}", f"status {SEGMENT} {PAGE}"]
    # As the rest of a VRANGE_PARTIAL range would be: purged by a purge of everything.
    assert output[2:] == [f"rest {SEGMENT - PAGE}", "pins 1", "pages ZZZZ"]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_read_only_table_cannot_be_reopened_for_writing(vol: Mount, c_program: str) -> None:
    output = run(c_program, "reopen", vol.path / "reopen.bin")
    assert output == ["handed read-only", f"reopen {errno.errorcode[errno.EACCES]}"]


def test_segments_past_the_end_of_the_file_do_not_stall_a_purge(vol: Mount, c_program: str) -> None:
    # 64 one-page segments unpinned, then truncated away; one more in another file.
    with subprocess.Popen(
        [c_program, "past-eof", str(vol.path / "past.bin"), "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            output, errors = child.communicate(timeout=PURGE_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Only the daemon's end ends the purge (and the program, inside the ioctl).
            vol.process.kill()
            child.communicate(timeout=PROGRAM_TIMEOUT)
            pytest.fail(f"VOLFS_IOC_PURGE did not return within {PURGE_TIMEOUT:g} s")
    assert child.returncode == 0, f"{output}{errors}"
    assert output.splitlines() == ["purging", f"purged {PAGE}", f"other {abi.SEGMENT_PURGED}"]
