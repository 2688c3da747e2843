/*
 * ref_memfs: the reference C filesystem of scripts/bench_io.py.
 *
 * The thinnest multi-threaded low-level libfuse 3 in-memory filesystem, the C counterpart of
 * scripts/ceiling_fs.py: what it reaches in bench_io.py's jobs is the fastest a C libfuse
 * daemon does them on this machine, so volfs/c-ref says how far volfs is from that.
 *
 * It holds a tree of directories and regular files in memory. A file's contents are one
 * growable buffer; a file or directory lives until it is unlinked and the kernel has
 * forgotten it. One global mutex guards the names (a hash table of (parent, name) entries,
 * plus each directory's children in creation order for readdir) and the lookup counts; a
 * read-write lock per inode guards its contents, attributes and extended attributes.
 * There are no hard links, symlinks, renames, device nodes or size limits.
 *
 * The FUSE settings are ceiling_fs.py's, so the two daemons get the same requests:
 *   - default_permissions, fsname=ref_memfs,subtype=ref_memfs (/proc/mounts: fuse.ref_memfs)
 *   - the capabilities pyfuse3 asks for, so the INIT reply's flags equal ceiling_fs's:
 *     libfuse's defaults (async reads, automatic data invalidation, atomic O_TRUNC, the server
 *     clears setuid/setgid on writes), READDIRPLUS for every listing, lookups of "." and "..";
 *     no writeback cache, no direct I/O
 *   - keep_cache on every open and create
 *   - 1 s entry and attribute timeouts; absent names are not cached (ENOENT, no entry)
 *   - st_blksize 4096, max_write libfuse's default of 1 MiB
 *   - extended attributes supported, so the kernel asks for security.capability before
 *     every write(2) here as it does on ceiling_fs
 * It differs where a Python daemon cannot follow: requests are served by libfuse's
 * multi-threaded loop (fuse_session_loop_mt: worker threads, each blocking in its own read of
 * /dev/fuse, started as requests overlap, up to max_threads), and writes arrive in one buffer
 * (no write_buf, so libfuse reads requests with read(2), not splice).
 *
 * Build (bench_io.py does this itself, into its work directory):
 *   cc -O2 -Wall -Wextra -o ref_memfs ref_memfs.c $(pkg-config --cflags --libs fuse3) -lpthread
 *
 * Usage:
 *   ref_memfs MOUNTPOINT [-f] [-d] [-s] [-o OPTIONS]
 * It always runs in the foreground (-f is accepted and changes nothing), until
 * `fusermount3 -u MOUNTPOINT`, SIGTERM, SIGINT or SIGHUP, then unmounts and exits 0. -d logs
 * every request, -s serves with one thread; -o takes libfuse's options (clone_fd,
 * max_threads=N, ...).
 */

#define FUSE_USE_VERSION 312
#define _GNU_SOURCE

#include <fuse_lowlevel.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#define TIMEOUT 1.0
#define BLKSIZE 4096
#define NAME_MAX_LEN 255
#define DEFAULT_OPTIONS "-odefault_permissions,fsname=ref_memfs,subtype=ref_memfs"

struct xattr {
	struct xattr *next;
	char *value;
	size_t size;
	char name[];
};

struct node {
	/* Under tree_lock. */
	struct node *parent; /* NULL for the root and once unlinked */
	struct node *hnext; /* next in the hash bucket */
	struct node *prev, *next; /* siblings, in creation order */
	struct node *first, *last; /* children of a directory */
	uint64_t hash;
	uint64_t nlookup;
	/* Changed under tree_lock and the node's write lock; read under either. */
	nlink_t nlink;
	/* Set at creation, never changed. */
	uint64_t serial; /* st_ino and readdir cookie; ascending in creation order */
	int is_dir;
	/* Under lock. */
	pthread_rwlock_t lock;
	mode_t mode;
	uid_t uid;
	gid_t gid;
	struct timespec atime, mtime, ctime;
	char *data;
	size_t size, cap;
	struct xattr *xattrs;
	/* Set at creation, never changed. */
	size_t namelen;
	char name[];
};

static pthread_mutex_t tree_lock = PTHREAD_MUTEX_INITIALIZER;
static struct node *root;
static struct node **buckets;
static size_t nbuckets, nentries;
static uint64_t next_serial = FUSE_ROOT_ID + 1;

/* -- helpers --------------------------------------------------------------------------------- */

static struct timespec now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ts;
}

static struct node *node_of(fuse_ino_t ino)
{
	return ino == FUSE_ROOT_ID ? root : (struct node *)(uintptr_t)ino;
}

static fuse_ino_t ino_of(const struct node *n)
{
	return n == root ? FUSE_ROOT_ID : (fuse_ino_t)(uintptr_t)n;
}

static struct node *node_new(const char *name, size_t namelen, mode_t mode, uid_t uid, gid_t gid)
{
	struct node *n = calloc(1, sizeof(*n) + namelen + 1);
	if (n == NULL)
		return NULL;
	if (pthread_rwlock_init(&n->lock, NULL) != 0) {
		free(n);
		return NULL;
	}
	memcpy(n->name, name, namelen);
	n->namelen = namelen;
	n->mode = mode;
	n->is_dir = S_ISDIR(mode);
	n->nlink = n->is_dir ? 2 : 1;
	n->uid = uid;
	n->gid = gid;
	n->atime = n->mtime = n->ctime = now();
	return n;
}

static void node_free(struct node *n)
{
	struct xattr *x, *next;
	for (x = n->xattrs; x != NULL; x = next) {
		next = x->next;
		free(x->value);
		free(x);
	}
	free(n->data);
	pthread_rwlock_destroy(&n->lock);
	free(n);
}

/* Frees an inode that has no name and that the kernel forgot. Under tree_lock. */
static void maybe_free(struct node *n)
{
	if (n != root && n->nlink == 0 && n->nlookup == 0)
		node_free(n);
}

static void fill_stat(struct node *n, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	pthread_rwlock_rdlock(&n->lock);
	st->st_ino = n->serial;
	st->st_mode = n->mode;
	st->st_nlink = n->nlink;
	st->st_uid = n->uid;
	st->st_gid = n->gid;
	st->st_size = n->size;
	st->st_blksize = BLKSIZE;
	st->st_blocks = (n->size + 511) / 512;
	st->st_atim = n->atime;
	st->st_mtim = n->mtime;
	st->st_ctim = n->ctime;
	pthread_rwlock_unlock(&n->lock);
}

static void fill_entry(struct node *n, struct fuse_entry_param *e)
{
	memset(e, 0, sizeof(*e));
	e->ino = ino_of(n);
	e->attr_timeout = TIMEOUT;
	e->entry_timeout = TIMEOUT;
	fill_stat(n, &e->attr);
}

static void forget_one(struct node *n, uint64_t nlookup)
{
	pthread_mutex_lock(&tree_lock);
	n->nlookup = nlookup < n->nlookup ? n->nlookup - nlookup : 0;
	maybe_free(n);
	pthread_mutex_unlock(&tree_lock);
}

/* Clears setuid, and setgid if group-executable, on a write, truncate or chown. Under lock. */
static void kill_suid(struct node *n)
{
	n->mode &= ~S_ISUID;
	if ((n->mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP))
		n->mode &= ~S_ISGID;
}

/* Makes room for `need` bytes of contents. Under the write lock. */
static int reserve(struct node *n, size_t need)
{
	size_t cap;
	char *data;
	if (need <= n->cap)
		return 0;
	cap = n->cap ? n->cap : BLKSIZE;
	while (cap < need) {
		if (cap > SIZE_MAX / 2)
			return ENOSPC;
		cap *= 2;
	}
	data = realloc(n->data, cap);
	if (data == NULL)
		return ENOSPC;
	n->data = data;
	n->cap = cap;
	return 0;
}

/* Sets the size, zero-filling what it grows by. Under the write lock. */
static int resize(struct node *n, size_t size)
{
	if (size > n->size) {
		int err = reserve(n, size);
		if (err)
			return err;
		memset(n->data + n->size, 0, size - n->size);
	} else if (size == 0) {
		free(n->data);
		n->data = NULL;
		n->cap = 0;
	} else if (size < n->cap / 4) {
		char *data = realloc(n->data, size);
		if (data != NULL) {
			n->data = data;
			n->cap = size;
		}
	}
	n->size = size;
	return 0;
}

/* -- names (under tree_lock) ----------------------------------------------------------------- */

static uint64_t name_hash(const struct node *parent, const char *name, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ULL ^ (parent->serial * 0x9e3779b97f4a7c15ULL);
	for (size_t i = 0; i < len; i++) {
		h ^= (unsigned char)name[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

static struct node *find(struct node *parent, const char *name, size_t len, uint64_t h)
{
	struct node *n;
	for (n = buckets[h & (nbuckets - 1)]; n != NULL; n = n->hnext)
		if (n->hash == h && n->parent == parent && n->namelen == len &&
		    memcmp(n->name, name, len) == 0)
			return n;
	return NULL;
}

static int grow_table(void)
{
	size_t count = nbuckets * 2;
	struct node **table = calloc(count, sizeof(*table));
	if (table == NULL)
		return ENOMEM;
	for (size_t i = 0; i < nbuckets; i++) {
		struct node *n, *next;
		for (n = buckets[i]; n != NULL; n = next) {
			next = n->hnext;
			n->hnext = table[n->hash & (count - 1)];
			table[n->hash & (count - 1)] = n;
		}
	}
	free(buckets);
	buckets = table;
	nbuckets = count;
	return 0;
}

/* Gives `n` its name in `parent`. */
static void link_node(struct node *parent, struct node *n, uint64_t h)
{
	struct node **bucket;
	if (nentries >= nbuckets)
		grow_table(); /* if that fails, the chains get longer */
	n->serial = next_serial++;
	n->parent = parent;
	n->hash = h;
	bucket = &buckets[h & (nbuckets - 1)];
	n->hnext = *bucket;
	*bucket = n;
	nentries++;
	n->prev = parent->last;
	n->next = NULL;
	if (parent->last != NULL)
		parent->last->next = n;
	else
		parent->first = n;
	parent->last = n;
}

/* Takes `n`'s name away; it lives on while the kernel knows it. */
static void unlink_node(struct node *n)
{
	struct node *parent = n->parent;
	struct node **link = &buckets[n->hash & (nbuckets - 1)];
	while (*link != n)
		link = &(*link)->hnext;
	*link = n->hnext;
	nentries--;
	if (n->prev != NULL)
		n->prev->next = n->next;
	else
		parent->first = n->next;
	if (n->next != NULL)
		n->next->prev = n->prev;
	else
		parent->last = n->prev;
	n->parent = n->hnext = n->prev = n->next = NULL;
}

static void touch_dir(struct node *dir, int dnlink)
{
	pthread_rwlock_wrlock(&dir->lock);
	dir->nlink += dnlink;
	dir->mtime = dir->ctime = now();
	pthread_rwlock_unlock(&dir->lock);
}

/* -- entries --------------------------------------------------------------------------------- */

static void memfs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct node *p = node_of(parent), *n;
	struct fuse_entry_param e;
	size_t len = strlen(name);

	if (len > NAME_MAX_LEN) {
		fuse_reply_err(req, ENAMETOOLONG);
		return;
	}
	pthread_mutex_lock(&tree_lock);
	if (!p->is_dir) {
		pthread_mutex_unlock(&tree_lock);
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	if (strcmp(name, ".") == 0)
		n = p;
	else if (strcmp(name, "..") == 0)
		n = p->parent != NULL ? p->parent : p;
	else
		n = find(p, name, len, name_hash(p, name, len));
	if (n == NULL) {
		pthread_mutex_unlock(&tree_lock);
		fuse_reply_err(req, ENOENT);
		return;
	}
	n->nlookup++;
	pthread_mutex_unlock(&tree_lock);
	fill_entry(n, &e);
	if (fuse_reply_entry(req, &e) != 0)
		forget_one(n, 1);
}

static void memfs_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	forget_one(node_of(ino), nlookup);
	fuse_reply_none(req);
}

static void memfs_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	pthread_mutex_lock(&tree_lock);
	for (size_t i = 0; i < count; i++) {
		struct node *n = node_of(forgets[i].ino);
		n->nlookup = forgets[i].nlookup < n->nlookup ? n->nlookup - forgets[i].nlookup : 0;
		maybe_free(n);
	}
	pthread_mutex_unlock(&tree_lock);
	fuse_reply_none(req);
}

/* Creates a file or directory `name` in `parent`, counted as looked up once. */
static int make_node(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
		     struct node **out)
{
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	struct node *p = node_of(parent), *n;
	size_t len = strlen(name);
	gid_t gid = ctx->gid;
	uint64_t h;

	if (len > NAME_MAX_LEN)
		return ENAMETOOLONG;
	mode = (mode & S_IFMT) | (mode & 07777 & ~ctx->umask);
	pthread_mutex_lock(&tree_lock);
	if (!p->is_dir) {
		pthread_mutex_unlock(&tree_lock);
		return ENOTDIR;
	}
	if (p->nlink == 0) {
		pthread_mutex_unlock(&tree_lock);
		return ENOENT;
	}
	h = name_hash(p, name, len);
	if (find(p, name, len, h) != NULL) {
		pthread_mutex_unlock(&tree_lock);
		return EEXIST;
	}
	pthread_rwlock_rdlock(&p->lock);
	if (p->mode & S_ISGID) {
		gid = p->gid;
		if (S_ISDIR(mode))
			mode |= S_ISGID;
	}
	pthread_rwlock_unlock(&p->lock);
	n = node_new(name, len, mode, ctx->uid, gid);
	if (n == NULL) {
		pthread_mutex_unlock(&tree_lock);
		return ENOMEM;
	}
	n->nlookup = 1;
	link_node(p, n, h);
	touch_dir(p, n->is_dir ? 1 : 0);
	pthread_mutex_unlock(&tree_lock);
	*out = n;
	return 0;
}

static void memfs_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
			 struct fuse_file_info *fi)
{
	struct fuse_entry_param e;
	struct node *n;
	int err = make_node(req, parent, name, S_IFREG | (mode & 07777), &n);

	if (err) {
		fuse_reply_err(req, err);
		return;
	}
	fill_entry(n, &e);
	fi->keep_cache = 1;
	if (fuse_reply_create(req, &e, fi) != 0)
		forget_one(n, 1);
}

static void memfs_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	struct fuse_entry_param e;
	struct node *n;
	int err = make_node(req, parent, name, S_IFDIR | (mode & 07777), &n);

	if (err) {
		fuse_reply_err(req, err);
		return;
	}
	fill_entry(n, &e);
	if (fuse_reply_entry(req, &e) != 0)
		forget_one(n, 1);
}

static void remove_entry(fuse_req_t req, fuse_ino_t parent, const char *name, int dir)
{
	struct node *p = node_of(parent), *n;
	size_t len = strlen(name);
	int err = 0;

	pthread_mutex_lock(&tree_lock);
	n = p->is_dir ? find(p, name, len, name_hash(p, name, len)) : NULL;
	if (!p->is_dir)
		err = ENOTDIR;
	else if (n == NULL)
		err = ENOENT;
	else if (dir && !n->is_dir)
		err = ENOTDIR;
	else if (!dir && n->is_dir)
		err = EISDIR;
	else if (dir && n->first != NULL)
		err = ENOTEMPTY;
	if (!err) {
		unlink_node(n);
		pthread_rwlock_wrlock(&n->lock);
		n->nlink = 0;
		n->ctime = now();
		pthread_rwlock_unlock(&n->lock);
		touch_dir(p, dir ? -1 : 0);
		maybe_free(n);
	}
	pthread_mutex_unlock(&tree_lock);
	fuse_reply_err(req, err);
}

static void memfs_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	remove_entry(req, parent, name, 0);
}

static void memfs_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	remove_entry(req, parent, name, 1);
}

/* -- attributes ------------------------------------------------------------------------------ */

static void memfs_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;
	(void)fi;
	fill_stat(node_of(ino), &st);
	fuse_reply_attr(req, &st, TIMEOUT);
}

static void memfs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
			  struct fuse_file_info *fi)
{
	struct node *n = node_of(ino);
	struct timespec t = now();
	struct stat st;
	int err = 0;
	(void)fi;

	pthread_rwlock_wrlock(&n->lock);
	if (to_set & FUSE_SET_ATTR_SIZE) {
		if (n->is_dir) {
			err = EISDIR;
		} else if (attr->st_size < 0) {
			err = EINVAL;
		} else {
			err = resize(n, (size_t)attr->st_size);
			if (!err) {
				n->mtime = t;
				kill_suid(n);
			}
		}
		if (err)
			goto out;
	}
	if ((to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) && !n->is_dir)
		kill_suid(n);
	if (to_set & FUSE_SET_ATTR_MODE)
		n->mode = (n->mode & S_IFMT) | (attr->st_mode & 07777);
	if (to_set & FUSE_SET_ATTR_UID)
		n->uid = attr->st_uid;
	if (to_set & FUSE_SET_ATTR_GID)
		n->gid = attr->st_gid;
	if (to_set & FUSE_SET_ATTR_ATIME)
		n->atime = attr->st_atim;
	else if (to_set & FUSE_SET_ATTR_ATIME_NOW)
		n->atime = t;
	if (to_set & FUSE_SET_ATTR_MTIME)
		n->mtime = attr->st_mtim;
	else if (to_set & FUSE_SET_ATTR_MTIME_NOW)
		n->mtime = t;
	n->ctime = (to_set & FUSE_SET_ATTR_CTIME) ? attr->st_ctim : t;
out:
	pthread_rwlock_unlock(&n->lock);
	if (err) {
		fuse_reply_err(req, err);
		return;
	}
	fill_stat(n, &st);
	fuse_reply_attr(req, &st, TIMEOUT);
}

/* -- file I/O -------------------------------------------------------------------------------- */

static void memfs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct node *n = node_of(ino);

	if (n->is_dir) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (fi->flags & O_TRUNC) {
		pthread_rwlock_wrlock(&n->lock);
		if (n->size != 0) {
			resize(n, 0);
			n->mtime = n->ctime = now();
			kill_suid(n);
		}
		pthread_rwlock_unlock(&n->lock);
	}
	fi->keep_cache = 1;
	fuse_reply_open(req, fi);
}

static void memfs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct node *n = node_of(ino);
	size_t count = 0;
	(void)fi;

	/* The reply is copied out of the buffer, so the lock is held until it is sent. */
	pthread_rwlock_rdlock(&n->lock);
	if (off >= 0 && (size_t)off < n->size)
		count = n->size - (size_t)off < size ? n->size - (size_t)off : size;
	fuse_reply_buf(req, count ? n->data + off : NULL, count);
	pthread_rwlock_unlock(&n->lock);
}

static void memfs_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
			struct fuse_file_info *fi)
{
	struct node *n = node_of(ino);
	size_t end;
	int err = 0;
	(void)fi;

	if (off < 0 || (size_t)off > SIZE_MAX - size) {
		fuse_reply_err(req, EFBIG);
		return;
	}
	end = (size_t)off + size;
	pthread_rwlock_wrlock(&n->lock);
	err = reserve(n, end);
	if (!err) {
		if ((size_t)off > n->size)
			memset(n->data + n->size, 0, (size_t)off - n->size);
		memcpy(n->data + off, buf, size);
		if (end > n->size)
			n->size = end;
		n->mtime = n->ctime = now();
		kill_suid(n);
	}
	pthread_rwlock_unlock(&n->lock);
	if (err)
		fuse_reply_err(req, err);
	else
		fuse_reply_write(req, size);
}

static void memfs_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
			    struct fuse_file_info *fi)
{
	struct node *n = node_of(ino);
	int err = 0;
	(void)fi;

	if (mode != 0) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	if (offset < 0 || length <= 0 || offset > LLONG_MAX - length) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	pthread_rwlock_wrlock(&n->lock);
	if ((size_t)(offset + length) > n->size) {
		err = resize(n, (size_t)(offset + length));
		if (!err)
			n->mtime = n->ctime = now();
	}
	pthread_rwlock_unlock(&n->lock);
	fuse_reply_err(req, err);
}

static void memfs_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	fuse_reply_err(req, 0);
}

static void memfs_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino;
	(void)datasync;
	(void)fi;
	fuse_reply_err(req, 0);
}

static void memfs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	fuse_reply_err(req, 0);
}

/* -- directories ----------------------------------------------------------------------------- */

/*
 * Lists a directory: "." (cookie 1), ".." (2), then the children in creation order (a child's
 * cookie is its serial + 2, so a listing resumes correctly across creations and removals).
 * With `plus`, each entry carries its attributes and counts as a lookup of the child.
 */
static void list_dir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus)
{
	struct node *d = node_of(ino), *c;
	struct fuse_entry_param e;
	size_t pos = 0, len;
	char *buf;

	if (!d->is_dir) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	buf = malloc(size);
	if (buf == NULL) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	memset(&e, 0, sizeof(e));
	pthread_mutex_lock(&tree_lock);
	for (off_t cookie = off >= 0 && off < 2 ? off + 1 : 3; cookie <= 2; cookie++) {
		/* The kernel takes no lookup count for these two. */
		c = cookie == 1 || d->parent == NULL ? d : d->parent;
		if (plus) {
			fill_entry(c, &e);
			len = fuse_add_direntry_plus(req, buf + pos, size - pos,
						     cookie == 1 ? "." : "..", &e, cookie);
		} else {
			e.attr.st_ino = c->serial;
			e.attr.st_mode = S_IFDIR;
			len = fuse_add_direntry(req, buf + pos, size - pos,
						cookie == 1 ? "." : "..", &e.attr, cookie);
		}
		if (len > size - pos)
			goto full;
		pos += len;
	}
	for (c = d->first; c != NULL; c = c->next) {
		off_t cookie = (off_t)(c->serial + 2);
		if (cookie <= off)
			continue;
		if (plus) {
			fill_entry(c, &e);
			len = fuse_add_direntry_plus(req, buf + pos, size - pos, c->name, &e, cookie);
		} else {
			e.attr.st_ino = c->serial;
			e.attr.st_mode = c->is_dir ? S_IFDIR : S_IFREG;
			len = fuse_add_direntry(req, buf + pos, size - pos, c->name, &e.attr, cookie);
		}
		if (len > size - pos)
			break;
		pos += len;
		if (plus)
			c->nlookup++;
	}
full:
	pthread_mutex_unlock(&tree_lock);
	fuse_reply_buf(req, buf, pos);
	free(buf);
}

static void memfs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
			  struct fuse_file_info *fi)
{
	(void)fi;
	list_dir(req, ino, size, off, 0);
}

static void memfs_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
			      struct fuse_file_info *fi)
{
	(void)fi;
	list_dir(req, ino, size, off, 1);
}

static void memfs_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct statvfs st;
	(void)ino;

	memset(&st, 0, sizeof(st));
	st.f_bsize = BLKSIZE;
	st.f_frsize = BLKSIZE;
	st.f_blocks = st.f_bfree = st.f_bavail = (1ULL << 40) / BLKSIZE;
	st.f_files = st.f_ffree = st.f_favail = 1ULL << 32;
	st.f_namemax = NAME_MAX_LEN;
	fuse_reply_statfs(req, &st);
}

/* -- extended attributes (under the inode's lock) -------------------------------------------- */

static struct xattr **find_xattr(struct node *n, const char *name)
{
	struct xattr **link;
	for (link = &n->xattrs; *link != NULL; link = &(*link)->next)
		if (strcmp((*link)->name, name) == 0)
			return link;
	return link;
}

static void memfs_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	struct node *n = node_of(ino);
	struct xattr *x;

	pthread_rwlock_rdlock(&n->lock);
	x = *find_xattr(n, name);
	if (x == NULL)
		fuse_reply_err(req, ENODATA);
	else if (size == 0)
		fuse_reply_xattr(req, x->size);
	else if (size < x->size)
		fuse_reply_err(req, ERANGE);
	else
		fuse_reply_buf(req, x->value, x->size);
	pthread_rwlock_unlock(&n->lock);
}

static void memfs_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
			   size_t size, int flags)
{
	struct node *n = node_of(ino);
	struct xattr **link, *x;
	char *copy = NULL;
	int err = 0;

	if (size != 0 && (copy = malloc(size)) == NULL) {
		fuse_reply_err(req, ENOSPC);
		return;
	}
	if (size != 0)
		memcpy(copy, value, size);
	pthread_rwlock_wrlock(&n->lock);
	link = find_xattr(n, name);
	x = *link;
	if (x != NULL && (flags & XATTR_CREATE)) {
		err = EEXIST;
	} else if (x == NULL && (flags & XATTR_REPLACE)) {
		err = ENODATA;
	} else if (x != NULL) {
		free(x->value);
		x->value = copy;
		x->size = size;
		copy = NULL;
	} else if ((x = malloc(sizeof(*x) + strlen(name) + 1)) == NULL) {
		err = ENOSPC;
	} else {
		strcpy(x->name, name);
		x->value = copy;
		x->size = size;
		x->next = NULL;
		*link = x;
		copy = NULL;
	}
	if (!err)
		n->ctime = now();
	pthread_rwlock_unlock(&n->lock);
	free(copy);
	fuse_reply_err(req, err);
}

static void memfs_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	struct node *n = node_of(ino);
	struct xattr *x;
	size_t total = 0, pos = 0;
	char *buf;

	pthread_rwlock_rdlock(&n->lock);
	for (x = n->xattrs; x != NULL; x = x->next)
		total += strlen(x->name) + 1;
	if (size == 0) {
		fuse_reply_xattr(req, total);
	} else if (size < total) {
		fuse_reply_err(req, ERANGE);
	} else if (total == 0) {
		fuse_reply_buf(req, NULL, 0);
	} else if ((buf = malloc(total)) == NULL) {
		fuse_reply_err(req, ENOMEM);
	} else {
		for (x = n->xattrs; x != NULL; x = x->next) {
			size_t len = strlen(x->name) + 1;
			memcpy(buf + pos, x->name, len);
			pos += len;
		}
		fuse_reply_buf(req, buf, total);
		free(buf);
	}
	pthread_rwlock_unlock(&n->lock);
}

static void memfs_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	struct node *n = node_of(ino);
	struct xattr **link, *x;
	int err = 0;

	pthread_rwlock_wrlock(&n->lock);
	link = find_xattr(n, name);
	x = *link;
	if (x == NULL) {
		err = ENODATA;
	} else {
		*link = x->next;
		free(x->value);
		free(x);
		n->ctime = now();
	}
	pthread_rwlock_unlock(&n->lock);
	fuse_reply_err(req, err);
}

static void memfs_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	/* As pyfuse3 has it: READDIRPLUS always, lookups of "." and "..", no writeback cache. */
	conn->want &= ~(FUSE_CAP_READDIRPLUS_AUTO | FUSE_CAP_WRITEBACK_CACHE);
	if (conn->capable & FUSE_CAP_EXPORT_SUPPORT)
		conn->want |= FUSE_CAP_EXPORT_SUPPORT;
}

static const struct fuse_lowlevel_ops memfs_ops = {
	.init = memfs_init,
	.lookup = memfs_lookup,
	.forget = memfs_forget,
	.forget_multi = memfs_forget_multi,
	.getattr = memfs_getattr,
	.setattr = memfs_setattr,
	.mkdir = memfs_mkdir,
	.unlink = memfs_unlink,
	.rmdir = memfs_rmdir,
	.create = memfs_create,
	.open = memfs_open,
	.read = memfs_read,
	.write = memfs_write,
	.flush = memfs_flush,
	.fsync = memfs_fsync,
	.release = memfs_release,
	.fallocate = memfs_fallocate,
	.readdir = memfs_readdir,
	.readdirplus = memfs_readdirplus,
	.statfs = memfs_statfs,
	.setxattr = memfs_setxattr,
	.getxattr = memfs_getxattr,
	.listxattr = memfs_listxattr,
	.removexattr = memfs_removexattr,
};

/* -- main ------------------------------------------------------------------------------------ */

static void usage(FILE *out, const char *prog)
{
	fprintf(out, "usage: %s MOUNTPOINT [-f] [-d] [-s] [-o OPTIONS]\n\n", prog);
}

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	struct fuse_cmdline_opts opts;
	struct fuse_loop_config *config;
	struct fuse_session *se;
	int ret = 1;

	/* The defaults go ahead of the user's options, which thus override them. */
	if (fuse_opt_add_arg(&args, argv[0]) != 0 || fuse_opt_add_arg(&args, DEFAULT_OPTIONS) != 0)
		return 1;
	for (int i = 1; i < argc; i++)
		if (fuse_opt_add_arg(&args, argv[i]) != 0)
			return 1;
	if (fuse_parse_cmdline(&args, &opts) != 0)
		return 1;
	if (opts.show_help) {
		usage(stdout, argv[0]);
		fuse_cmdline_help();
		fuse_lowlevel_help();
		ret = 0;
		goto out;
	}
	if (opts.show_version) {
		printf("FUSE library version %s\n", fuse_pkgversion());
		fuse_lowlevel_version();
		ret = 0;
		goto out;
	}
	if (opts.mountpoint == NULL) {
		usage(stderr, argv[0]);
		goto out;
	}

	nbuckets = 1024;
	buckets = calloc(nbuckets, sizeof(*buckets));
	root = node_new("", 0, S_IFDIR | 0755, getuid(), getgid());
	if (buckets == NULL || root == NULL) {
		fprintf(stderr, "ref_memfs: out of memory\n");
		goto out;
	}
	root->serial = FUSE_ROOT_ID;

	se = fuse_session_new(&args, &memfs_ops, sizeof(memfs_ops), NULL);
	if (se == NULL)
		goto out;
	if (fuse_set_signal_handlers(se) != 0)
		goto out_destroy;
	if (fuse_session_mount(se, opts.mountpoint) != 0)
		goto out_signals;

	if (opts.singlethread) {
		ret = fuse_session_loop(se);
	} else {
		config = fuse_loop_cfg_create();
		if (config == NULL) {
			ret = -ENOMEM;
		} else {
			fuse_loop_cfg_set_clone_fd(config, opts.clone_fd);
			if (opts.max_idle_threads != UINT_MAX)
				fuse_loop_cfg_set_idle_threads(config, opts.max_idle_threads);
			fuse_loop_cfg_set_max_threads(config, opts.max_threads);
			ret = fuse_session_loop_mt(se, config);
			fuse_loop_cfg_destroy(config);
		}
	}
	/* 0 after an unmount, the signal's number after SIGTERM, SIGINT or SIGHUP. */
	ret = ret < 0 ? 1 : 0;

	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_destroy:
	fuse_session_destroy(se);
out:
	free(opts.mountpoint);
	fuse_opt_free_args(&args);
	return ret;
}
